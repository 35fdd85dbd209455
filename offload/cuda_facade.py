"""``torch.cuda`` and ``torch.accelerator`` of a CPU-only torch, answering for the virtual device.

Inside a program on the platform there is exactly one CUDA device, ``cuda:0``: the virtual
accelerator, named ``MoAI Accelerator <device size>`` with the device size's memory. Queries
are answered by the job session (offload/session.py); seeds and synchronization travel in its op
stream. Internals that only a program driving CUDA itself would call (``torch.cuda._lazy_init``,
``cudart``, CUDA graphs ...) fail with the platform's clear error (offload/unsupported.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random as _random
import uuid
import warnings

import torch
import torch.accelerator
import torch.backends.cudnn
import torch.cuda
import torch.cuda.jiterator
import torch.cuda.nvtx
import torch.cuda.random
import torch.nn.parallel._functions

from offload import cuda_streams, generators, sync_debug, unsupported
from offload.device_mapping import map_device

DEVICE_NAME_PREFIX = "MoAI Accelerator"
# Reported like an H100 (sm_90): libraries gate bf16 / flash paths on this.
COMPUTE_CAPABILITY = (9, 0)
MULTI_PROCESSOR_COUNT = 132

_initial_seed: int | None = None
_memory_fraction = 1.0   # set_per_process_memory_fraction's, as the workers enforce it


def _session():
    from offload import session
    return session


def _check_index(device) -> int:
    """The index a device argument names: only cuda:0 exists (map_device refuses cuda:1 and up)."""
    backend = torch._C._get_privateuse1_backend_name()
    if device is None or (isinstance(device, torch.device) and device.type == backend):
        return 0
    mapped = map_device(device)
    if not (isinstance(mapped, torch.device) and mapped.type == backend):
        raise ValueError(f"Expected a cuda device, but got: {device}")
    return 0


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What ``torch.cuda.get_device_properties`` returns, for the virtual device."""

    name: str
    total_memory: int
    major: int = COMPUTE_CAPABILITY[0]
    minor: int = COMPUTE_CAPABILITY[1]
    multi_processor_count: int = MULTI_PROCESSOR_COUNT
    is_integrated: bool = False
    is_multi_gpu_board: bool = False
    warp_size: int = 32
    # The rest of torch's fields, an H100 SXM's as the capability above is (libraries size
    # kernels' tiles by the shared memory and read the rest into their environment reports).
    max_threads_per_multi_processor: int = 2048
    shared_memory_per_block: int = 48 << 10
    shared_memory_per_multiprocessor: int = 228 << 10
    L2_cache_size: int = 50 << 20
    clock_rate: int = 1_980_000          # kHz
    memory_clock_rate: int = 2_619_000   # kHz
    memory_bus_width: int = 5120         # bits
    uuid: str = ""   # stable for a device size: named after it

    def __repr__(self):
        return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, "
                f"minor={self.minor}, total_memory={self.total_memory // (1 << 20)}MB, "
                f"multi_processor_count={self.multi_processor_count})")


# --- device identity -----------------------------------------------------------------------------
def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device):
    _check_index(device)


class device(contextlib.ContextDecorator):
    """``with torch.cuda.device(0):`` — the only device is already current."""

    def __init__(self, device):
        self.idx = _check_index(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class device_of(device):
    """``with torch.cuda.device_of(tensor):`` — the tensor's device, the only one (none for a host
    tensor, as torch's ``-1``)."""

    def __init__(self, obj):
        self.idx = 0 if obj.is_cuda else -1


def get_device_name(device=None) -> str:
    _check_index(device)
    return f"{DEVICE_NAME_PREFIX} {_session().device_size_name()}"


def get_device_properties(device=None) -> DeviceProperties:
    _check_index(device)
    name = get_device_name()
    return DeviceProperties(name=name, total_memory=_session().total_memory(),
                            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, name)}")


def get_device_capability(device=None) -> tuple[int, int]:
    _check_index(device)
    return COMPUTE_CAPABILITY


def get_arch_list() -> list[str]:
    # Libraries check the device's architecture against the build's list (a CPU build's is empty).
    return [f"sm_{COMPUTE_CAPABILITY[0]}{COMPUTE_CAPABILITY[1]}"]


def true(*args, **kwargs) -> bool:
    return True


def false(*args, **kwargs) -> bool:
    return False


# --- torch.cuda.comm over the one device (nn.DataParallel) -----------------------------------------
def _one_device(devices) -> None:
    if list(devices) != [0]:
        raise ValueError(f"devices {list(devices)}: the virtual device cuda:0 is the only one")


def _scatter(tensor, devices, chunk_sizes, dim, streams):
    """``torch.cuda.comm.scatter``'s primitive: the one chunk is the whole tensor, on the device
    (``nn.DataParallel(model)`` on one GPU, and its backward's gather below)."""
    _one_device(devices)
    return [tensor.to("cuda")]


def _gather(tensors, dim, destination):
    _one_device(range(len(tensors)))
    return tensors[0].to("cpu" if destination == -1 else "cuda")


# --- synchronization and memory ------------------------------------------------------------------
def synchronize(device=None):
    _check_index(device)
    _session().synchronize()


def memory_allocated(device=None) -> int:
    _check_index(device)
    return _session().memory_stats()["allocated"]


def max_memory_allocated(device=None) -> int:
    _check_index(device)
    return _session().memory_stats()["peak"]


def reset_peak_memory_stats(device=None):
    _check_index(device)
    _session().reset_peak()


def set_per_process_memory_fraction(fraction, device=None):
    """Caps the device's memory for this process at ``fraction`` of it, as on CUDA: past it ops
    raise ``torch.cuda.OutOfMemoryError`` (the workers enforce it)."""
    global _memory_fraction
    _check_index(device)
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if not 0 <= fraction <= 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    _session().set_memory_fraction(fraction)
    _memory_fraction = fraction


def get_per_process_memory_fraction(device=None) -> float:
    _check_index(device)
    return _memory_fraction


def empty_cache():
    pass  # workers free a tensor as soon as its last front handle dies


def _no_host_memory(*args, **kwargs):
    pass  # pin_memory() keeps a tensor where it is: the front never allocates pinned memory


def device_memory_used(device=None) -> int:
    return memory_allocated(device)   # nvidia-smi's figure: the device's memory is the workers'


def can_device_access_peer(device, peer_device) -> bool:
    _check_index(device), _check_index(peer_device)
    return False   # CUDA's answer for a device and itself, the only pair there is


def mem_get_info(device=None) -> tuple[int, int]:
    total = _session().total_memory()
    return total - memory_allocated(device), total


# --- memory snapshots (pytorch.org/memory_viz reads them) -----------------------------------------
def _snapshot(device=None, augment_with_fx_traces=False) -> dict:
    """The device's live allocations, each worker's as a device of its own (its rank): GPU workers'
    allocators' segments, a CPU worker's storages. No history of allocations is kept."""
    _check_index(device)
    segments = _session().memory_snapshot()
    devices = 1 + max((s["device"] for s in segments), default=0)
    return {"segments": segments, "device_traces": [[] for _ in range(devices)]}


def memory_snapshot(mempool_id=None, include_traces=True) -> list[dict]:
    return _snapshot()["segments"]


def _record_memory_history(enabled="all", *args, **kwargs):
    if enabled:
        warnings.warn("torch.cuda.memory._record_memory_history: the virtual device keeps no history of "
                      "allocations; its snapshots show the live ones, without stack traces", stacklevel=2)


# --- telemetry (NVML's on a GPU: pynvml) ----------------------------------------------------------
# The device's GPUs as moreh-smi shows them: utilization and memory utilization averaged over
# them, the hottest one's temperature. Virtual GPUs report their worker's CPU time and memory,
# and no temperature.
def _sensor(device, name: str) -> list:
    _check_index(device)
    return [g[name] for g in _session().gpu_telemetry() if g.get(name) is not None]


def _not_reported(what: str):
    raise RuntimeError(f"torch.cuda.{what}: the GPUs of the virtual device cuda:0 do not report it "
                       "(moreh-smi shows what they do)")


def _mean(device, name: str) -> int:
    values = _sensor(device, name)
    return round(sum(values) / len(values)) if values else 0


def utilization(device=None) -> int:
    return _mean(device, "util")


def memory_usage(device=None) -> int:
    return _mean(device, "mem_util")


def temperature(device=None) -> int:
    values = _sensor(device, "temp_c")
    return max(values) if values else _not_reported("temperature")


def power_draw(device=None) -> int:
    _check_index(device)
    _not_reported("power_draw")


def clock_rate(device=None) -> int:
    _check_index(device)
    _not_reported("clock_rate")


# The statistics of CUDA's caching allocator (torch.cuda.memory_stats documents them): byte
# counts, counts of blocks, each for all pools, the large and the small one.
_BYTE_STATS = ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes")
_BLOCK_STATS = ("allocation", "segment", "active", "inactive_split", "inactive_split_bytes")
_COUNTERS = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
             "num_device_free", "max_split_size")


def memory_stats_as_nested_dict(device=None) -> dict:
    """The caching allocator's statistics in its layout, which torch's own ``memory_stats`` and
    ``memory_summary`` read: the workers' bytes in use and their peak, counted in the large pool
    (whole tensors, no splits); what the workers do not count (blocks, accumulated totals,
    retries) is 0."""
    _check_index(device)
    stats = _session().memory_stats()

    def stat(current=0, peak=0):
        return {"current": current, "peak": peak, "allocated": 0, "freed": 0}

    used = {"all": stat(stats["allocated"], stats["peak"]),
            "large_pool": stat(stats["allocated"], stats["peak"]), "small_pool": stat()}
    return {**{name: used for name in _BYTE_STATS},
            **{name: {"all": stat(), "large_pool": stat(), "small_pool": stat()} for name in _BLOCK_STATS},
            "oversize_allocations": stat(), "oversize_segments": stat(),
            **{name: 0 for name in _COUNTERS}}


# --- random numbers ------------------------------------------------------------------------------
def manual_seed(seed):
    global _initial_seed
    _initial_seed = int(seed)
    _session().manual_seed(int(seed))


def seed():
    manual_seed(_random.randrange(1 << 63))


def initial_seed() -> int:
    # Like CUDA's default generator: the seed of torch.manual_seed / torch.cuda.manual_seed.
    return torch.initial_seed() if _initial_seed is None else _initial_seed


def get_rng_state(device="cuda") -> torch.Tensor:
    _check_index(device)
    return _session().get_rng_state()


def set_rng_state(new_state: torch.Tensor, device="cuda"):
    _check_index(device)
    _session().set_rng_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state()]


def set_rng_state_all(new_states):
    set_rng_state(new_states[0])


_stock_to_dlpack = torch.utils.dlpack.to_dlpack


def _to_dlpack(tensor):
    # torch's C function reads the wrapper's storage: the device tensor's own method refuses.
    return tensor.__dlpack__() if tensor.is_cuda else _stock_to_dlpack(tensor)


# --- torch.accelerator ---------------------------------------------------------------------------
def current_accelerator(check_available: bool = False) -> torch.device:
    return torch.device("cuda")


def set_device_index(device):
    _check_index(device)


_FUNCTIONS = {
    "is_available": is_available, "device_count": device_count, "current_device": current_device,
    "set_device": set_device, "device": device, "device_of": device_of,
    "get_device_name": get_device_name, "get_device_properties": get_device_properties,
    "get_device_capability": get_device_capability, "get_arch_list": get_arch_list,
    "synchronize": synchronize, "is_initialized": true, "init": lambda: None, "is_bf16_supported": true,
    "is_tf32_supported": true, "is_current_stream_capturing": false,
    "memory_allocated": memory_allocated, "max_memory_allocated": max_memory_allocated,
    "memory_reserved": memory_allocated, "max_memory_reserved": max_memory_allocated,
    "reset_peak_memory_stats": reset_peak_memory_stats,
    "reset_max_memory_allocated": reset_peak_memory_stats, "empty_cache": empty_cache,
    # Cleanup code calls it after empty_cache; no other process shares the device's memory.
    "ipc_collect": lambda: None,
    "can_device_access_peer": can_device_access_peer,
    "mem_get_info": mem_get_info, "memory_stats_as_nested_dict": memory_stats_as_nested_dict,
    # torch's own: they read memory_stats_as_nested_dict, in the module patched below as well.
    "memory_stats": torch.cuda.memory.memory_stats, "memory_summary": torch.cuda.memory.memory_summary,
    "reset_accumulated_memory_stats": lambda device=None: None,   # no accumulated totals kept
    "reset_accumulated_host_memory_stats": _no_host_memory, "reset_peak_host_memory_stats": _no_host_memory,
    "device_memory_used": device_memory_used,
    "get_allocator_backend": lambda: "native",
    "set_per_process_memory_fraction": set_per_process_memory_fraction,
    "get_per_process_memory_fraction": get_per_process_memory_fraction,
    "set_sync_debug_mode": sync_debug.set_mode, "get_sync_debug_mode": sync_debug.get_mode,
    "memory_snapshot": memory_snapshot,
    "utilization": utilization, "memory_usage": memory_usage, "temperature": temperature,
    "power_draw": power_draw, "clock_rate": clock_rate,
}
_RANDOM = {
    "manual_seed": manual_seed, "manual_seed_all": manual_seed, "seed": seed, "seed_all": seed,
    "initial_seed": initial_seed, "get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
    "get_rng_state_all": get_rng_state_all, "set_rng_state_all": set_rng_state_all,
}
_ACCELERATOR = {
    "is_available": is_available, "current_accelerator": current_accelerator,
    "device_count": device_count, "current_device_index": current_device,
    "current_device_idx": current_device, "set_device_index": set_device_index,
    "set_device_idx": set_device_index, "synchronize": synchronize,
    "current_stream": cuda_streams.current_stream, "set_stream": cuda_streams.set_stream,
    "memory_allocated": memory_allocated, "max_memory_allocated": max_memory_allocated,
    "memory_reserved": memory_allocated, "max_memory_reserved": max_memory_allocated,
    "reset_peak_memory_stats": reset_peak_memory_stats, "empty_cache": empty_cache,
    "memory_stats": torch.cuda.memory.memory_stats, "get_memory_info": mem_get_info,
    "reset_accumulated_memory_stats": lambda device_index=None: None, "empty_host_cache": _no_host_memory,
    "get_device_capability": lambda device=None: {"supported_dtypes": [
        torch.float32, torch.float16, torch.bfloat16, torch.float64]},
}
# torch's submodules that hold their own references to the names patched (torch's
# reset_max_memory_cached calls torch.cuda.memory's reset_peak_memory_stats; torch.accelerator.memory's
# reach a device allocator the virtual device does not have: an internal assert, and a segmentation
# fault for empty_host_cache).
_CUDA_SUBMODULES = (torch.cuda.memory, torch.cuda.random, torch.cuda.graphs)
# TunableOp picks GEMM kernels on the GPU that runs them: the workers'.
_TUNABLE_QUERIES = ("is_enabled", "tuning_is_enabled", "record_untuned_is_enabled")
_TUNABLE_SWITCHES = ("enable", "tuning_enable", "record_untuned_enable")


def _tunable(name: str):
    refuse = unsupported.refusing(f"torch.cuda.tunable.{name}")
    if name not in _TUNABLE_SWITCHES:
        return refuse

    def switch(val: bool = True):
        if val:
            refuse()   # switching it off is what the device is already
    return switch


# Internals a program reaches only when it drives CUDA itself.
_DIRECT_CUDA = ("_lazy_init", "cudart", "current_blas_handle", "current_solver_handle",
                "caching_allocator_alloc", "caching_allocator_delete", "change_current_allocator",
                "CUDAPluggableAllocator", "MemPool", "use_mem_pool", "list_gpu_processes")


def install():
    """Replace the CUDA/accelerator queries of this CPU-only torch (idempotent)."""
    if torch.cuda.is_available is is_available:
        return
    for name, value in {**_FUNCTIONS, **_RANDOM, **cuda_streams.PATCHES}.items():
        setattr(torch.cuda, name, value)
    for module in _CUDA_SUBMODULES:
        for name, value in {**_FUNCTIONS, **_RANDOM, **cuda_streams.PATCHES}.items():
            # Their own guards keep torch's answer (a CPU build's CUDA is never initialized):
            # host_memory_stats, caching_allocator_enable ... stay off CUDA's C functions.
            if name in vars(module) and name != "is_initialized":
                setattr(module, name, value)
    torch.cuda.memory.memory_stats_as_nested_dict = memory_stats_as_nested_dict
    torch.cuda.default_generators = (generators.DefaultDeviceGenerator(),)
    torch.Stream = cuda_streams.device_agnostic(torch.Stream, cuda_streams.Stream, takes_device=True)
    torch.Event = cuda_streams.device_agnostic(torch.Event, cuda_streams.Event, takes_device=False)
    # torch's own _dump_snapshot reads _snapshot in its module.
    torch.cuda.memory._snapshot, torch.cuda.memory.memory_snapshot = _snapshot, memory_snapshot
    torch.cuda.memory._record_memory_history = _record_memory_history
    torch._C._scatter, torch._C._gather = _scatter, _gather   # CUDA builds' comm primitives
    # DataParallel copies a host batch in a side stream it asks for by a device it names by index
    # (the accelerator's type, ``moai`` here, which its check wants to be ``cuda``); uploads keep
    # their order in the one op stream anyway.
    torch.nn.parallel._functions._get_stream = lambda device: None
    for name in _DIRECT_CUDA:
        setattr(torch.cuda, name, unsupported.refusing(f"torch.cuda.{name}", getattr(torch.cuda, name)))
    for name in ("_create_jit_fn", "_create_multi_output_jit_fn"):
        # CUDA C++, compiled at a kernel's first call as CUDA's are: a module may make kernels at
        # import (torch's own op database does) and fails only where it runs one.
        kernel = unsupported.refusing(f"torch.cuda.jiterator.{name}")
        setattr(torch.cuda.jiterator, name, lambda *args, _kernel=kernel, **kwargs: _kernel)
    for name, value in _ACCELERATOR.items():
        setattr(torch.accelerator, name, value)
        if name in vars(torch.accelerator.memory):
            setattr(torch.accelerator.memory, name, value)
    for name in torch.cuda.tunable.__all__:
        setattr(torch.cuda.tunable, name, false if name in _TUNABLE_QUERIES else _tunable(name))
    torch.Tensor.record_stream = lambda self, stream: None
    torch.utils.dlpack.to_dlpack = torch.to_dlpack = _to_dlpack
    # nn.LSTM/GRU ask cuDNN about their weights at every forward (flatten_parameters); this build
    # has no cuDNN and would warn "compiled without cuDNN" for the virtual device's "cuda" tensors.
    # The workers pick their own kernels: the front never uses cuDNN.
    torch.backends.cudnn.is_acceptable = lambda tensor: False
    # nn.TransformerEncoder and nn.MultiheadAttention take a fused inference path on "cuda"
    # tensors (nested tensors, _transformer_encoder_layer_fwd), whose ops have no meta kernels:
    # under no_grad with a padding mask it failed. Their standard path gives the same numbers.
    torch.backends.mha.set_fastpath_enabled(False)
    # NVTX ranges annotate a profile of the GPU; the front has none to annotate (a CPU build would
    # raise "NVTX functions not installed"), so they do nothing, as outside a profiler run.
    for name in ("range_push", "range_pop", "range_start", "range_end", "mark"):
        setattr(torch.cuda.nvtx, name, lambda *args, **kwargs: 0)
    for name in ("blas_workspace_size", "cublas_workspace_size", "cublaslt_workspace_size"):
        if hasattr(torch.backends.cuda, name):   # cuBLAS's own configuration
            setattr(torch.backends.cuda, name, unsupported.refusing(f"torch.backends.cuda.{name}"))
    # Likewise the range a profiler such as nsys captures (cudaProfilerStart/Stop).
    torch.cuda.profiler.start = torch.cuda.profiler.stop = lambda: None
    unsupported.install()

