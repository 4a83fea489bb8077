"""Let megatron-core run on a CPU-only machine with the gloo backend (tests, CI, laptops).

megatron-core (written against 0.19.2) assumes CUDA in four ways, megatron.training in a few more (5); each gets
the smallest stand-in that computes the same thing on CPU:

1. Devices: ~60 hard-coded `device="cuda"` / `.cuda()` / `torch.cuda.current_device()` uses (optimizer scales,
   grad clipping, buffers). A process-wide TorchFunctionMode rewrites any CUDA device argument to CPU.
2. Type strings: asserts such as `grad.type() == "torch.cuda.FloatTensor"`. The same mode reports CPU tensors
   under their CUDA type name.
3. Streams: DDP's grad sync calls `torch.cuda.current_stream()` unconditionally (>= 0.17). CPU work is already
   ordered, so a stream whose methods do nothing is exact.
4. RNG: the tensor-parallel RNG tracker saves and restores the CUDA generator. The CPU default generator takes
   its place, so dropout forks behave as on GPU (different streams per TP rank, same per DP replica).
5. `megatron.training` (`pretrain`, when installed): its CUDA assertion, device count / set_device, the DDP
   setup stream, the GPU-architecture query and the fusion warm-up; each is explained where it is replaced.

Call `apply()` once per process before building models (it needs no process group: `megatron_muon.launch`
applies it before the training script runs). Never call it on a GPU machine: it hides the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_applied = False


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in device= and .to(); bool is an int subclass but never a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _names_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.cuda:
            return args[0]
        # Only .to's positional device slot; later slots are dtype / non_blocking / copy.
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            if not out.startswith("torch.cuda."):
                out = "torch.cuda." + out.removeprefix("torch.")
        return out


class _NoOpStream:
    """What torch.cuda.current_stream() returns on CPU: ops already run in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True


def apply() -> None:
    """Install the CPU stand-ins in this process (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not manual_seed_all: torch.manual_seed calls it, so mapping it to torch.manual_seed would recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    import megatron.core.tensor_parallel.random as tp_random

    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # With the CPU generator standing in for the CUDA one, every RNG fork warns that the "CPU" state changed.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)

    _CudaAsCpu().__enter__()  # stays active for the life of the process
    _shim_megatron_training()


def _shim_megatron_training() -> None:
    """Stand-ins that only `megatron.training` (pretrain / initialize_megatron) needs; skipped without it."""
    try:
        import megatron.training.arguments as arguments
        import megatron.training.initialize as initialize
        import megatron.training.training as training
    except ImportError:
        return
    # validate_args asks the GPU architecture (torch.cuda.get_device_properties) when TP or CP > 1. Answer
    # "older than Blackwell" (0): Megatron then treats the CPU as it treats a Hopper, including its demand for
    # CUDA_DEVICE_MAX_CONNECTIONS=1 with TP (set it as on a GPU; it means nothing on CPU).
    arguments.get_device_arch_version = lambda: 0
    cuda = torch.cuda
    # initialize_megatron builds the model-parallel groups and seeds the TP RNG tracker only when
    # device_count() > 0; each process plays one "device", its CPU.
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None  # called with LOCAL_RANK once device_count() > 0
    # get_model() builds DDP under `with torch.cuda.stream(torch.cuda.Stream())`; CPU work is in program order.
    cuda.Stream = _NoOpStream
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # pretrain() calls initialize_megatron(), which asserts CUDA unless allow_no_cuda=True (its CPU switch).
    original = initialize.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, allow_no_cuda=True, **kwargs):
        return original(*args, allow_no_cuda=allow_no_cuda, **kwargs)

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron
    # pretrain() warms up the GPU fusion kernels (bias-SwiGLU/GeLU, bias-dropout-add) on random "cuda" inputs.
    # On CPU that would torch.compile CPU kernels the run may never call (seconds per process, and a C++
    # compiler), and its torch.rand / dropout would draw from the CPU generator, which on GPU they leave alone:
    # --use-cpu-initialization weights would then depend on the TP size. Fusions still compile on first use.
    initialize._warmup_jit_function = lambda tp_size=None: None

