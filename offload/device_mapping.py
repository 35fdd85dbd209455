"""Makes ``"cuda"`` mean the virtual device wherever a torch program names a device.

A user's ``.cuda()``, ``.to("cuda")``, ``torch.zeros(..., device="cuda")`` and library code that
passes ``tensor.device`` on (which the virtual device's tensors report as ``cuda:0``) all reach the
entry points patched here, which swap the CUDA device for the virtual one before torch sees it.

Targeted patches rather than a ``TorchFunctionMode``: a mode lives on a per-thread stack, so it
would miss the DataLoader's pin-memory thread, prefetch threads and autograd's device threads, and
it costs every op ~3.7 us (measured on torch 2.13, 2 cores). A patch costs only the calls it wraps
(~1 us per factory call or ``Tensor.to``, nothing for any other op).

Pinning is a no-op: front tensors never go to a local GPU, so ``pin_memory()`` returns the CPU
tensor itself, in the main process, its threads and forked DataLoader workers alike.
"""
from __future__ import annotations

import functools

import torch
import torch.jit._builtins
import torch.utils._device

# Module-level torch functions that take ``device=``; names a torch version lacks are skipped.
FACTORY_FUNCTIONS = (
    "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange", "range",
    "linspace", "logspace", "eye", "tensor", "as_tensor", "asarray", "scalar_tensor",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "empty_strided", "tril_indices", "triu_indices", "normal", "sparse_coo_tensor",
    "hann_window", "hamming_window", "blackman_window", "bartlett_window", "kaiser_window",
)
# Tensor methods that take ``device=`` (the ``new_*`` family inherits its device otherwise).
TENSOR_DEVICE_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor",
                         "new_empty_strided")

# torch.nested's constructors: a nested tensor keeps its elements in one buffer that the shape
# inference and the workers' tables do not describe, so none is made on the virtual device.
NESTED_CONSTRUCTORS = ("nested_tensor", "as_nested_tensor", "nested_tensor_from_jagged", "narrow")

_MISSING = object()  # the name was inherited, not set on the patched object itself
_originals: dict[tuple[object, str], object] = {}


def virtual_device() -> torch.device:
    """The device that stands for ``cuda:0`` (the renamed PrivateUse1 backend, index 0)."""
    return torch.device(torch._C._get_privateuse1_backend_name(), 0)


def map_device(device):
    """``device`` with CUDA replaced by the virtual device; anything else comes back unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        # A bare ordinal means a CUDA device in torch's device arguments.
        device = torch.device("cuda", device)
    elif isinstance(device, str):
        if not device.startswith("cuda"):
            return device
        device = torch.device(device)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return device
    if device.index not in (None, 0):
        raise RuntimeError(
            f"CUDA error: invalid device ordinal: {device} does not exist; the MoAI Accelerator "
            f"is one virtual device, cuda:0 (choose a bigger device size for more GPUs)")
    return virtual_device()


def is_virtual(device) -> bool:
    """Whether ``device`` (a name, a ``torch.device``, a CUDA ordinal) is the virtual device."""
    return torch.device(map_device(device)) == virtual_device()


def _map_device_kwarg(func):
    @functools.wraps(func)
    def with_virtual_device(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None:
            kwargs["device"] = map_device(device)
        if kwargs.get("pin_memory"):
            # Asked for because torch.cuda.is_available() (save_on_cpu's buffers): pinning is a
            # no-op here, and this torch has no pinned allocator for the virtual device.
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)
    return with_virtual_device


def _on_the_device(x) -> bool:
    if isinstance(x, (list, tuple)):
        return any(_on_the_device(v) for v in x)
    return isinstance(x, torch.Tensor) and x.is_cuda   # this CPU-only torch's only CUDA tensors


def _refusing_the_device(func):
    @functools.wraps(func)
    def nested_constructor(*args, **kwargs):
        device = kwargs.get("device")
        if (device is not None and is_virtual(device)) or _on_the_device(args) \
                or _on_the_device(list(kwargs.values())):
            raise NotImplementedError(
                f"torch.nested.{func.__name__}: nested tensors are not supported on the virtual cuda:0 "
                "device; keep them on the CPU, or pad them into dense tensors")
        return func(*args, **kwargs)
    return nested_constructor


def _tensor_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        # Tensor.to(device, ...), .to(dtype, ...), .to(tensor, ...): only the first form names a
        # device positionally.
        if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
            args = (map_device(args[0]),) + args[1:]
        device = kwargs.get("device")
        if device is not None:
            kwargs["device"] = map_device(device)
        return original(self, *args, **kwargs)
    return to


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    target = map_device(torch.device("cuda") if device is None else device)
    return self.to(target, non_blocking=non_blocking, memory_format=memory_format)


def _pin_memory(self, device=None):
    return self


def _device_context_init(original):
    @functools.wraps(original)
    def __init__(self, device):
        original(self, map_device(device))
    return __init__


def _get_default_device(original):
    @functools.wraps(original)
    def get_default_device():
        device = original()
        # The context holds the virtual device; the program named, and sees everywhere, cuda:0.
        return torch.device("cuda", device.index) if device == virtual_device() else device
    return get_default_device


def script_builtin(original, replacement):
    """``replacement``, registered as the TorchScript builtin ``original`` is, if it is one: the
    script compiler knows a builtin by the function's identity, and tried to compile a wrapper
    from its source ("got builtin_function_or_method": an LSTM calls ``torch.zeros``)."""
    op = torch.jit._builtins._find_builtin(original)
    if op is not None:
        torch.jit._builtins._register_builtin(replacement, op)
    return replacement


def _patch(owner, name, replacement):
    _originals.setdefault((owner, name), vars(owner).get(name, _MISSING))
    setattr(owner, name, script_builtin(getattr(owner, name), replacement))


def install():
    """Patch the entry points (idempotent: a second call changes nothing)."""
    if _originals:
        return
    # `with torch.device("cuda"):` / set_default_device fill in ``device=`` only for the functions
    # in this lru_cached set, matched against the builtin the mode sees; filled lazily after the
    # patches below it would hold the wrappers, and factories in the context would stay on the CPU.
    torch.utils._device._device_constructors()
    for name in FACTORY_FUNCTIONS:
        if hasattr(torch, name):
            _patch(torch, name, _map_device_kwarg(getattr(torch, name)))
    for name in NESTED_CONSTRUCTORS:
        if hasattr(torch.nested, name):
            _patch(torch.nested, name, _refusing_the_device(getattr(torch.nested, name)))
    for name in TENSOR_DEVICE_METHODS:
        _patch(torch.Tensor, name, _map_device_kwarg(getattr(torch.Tensor, name)))
    _patch(torch.Tensor, "to", _tensor_to(torch.Tensor.to))
    _patch(torch.Tensor, "cuda", _tensor_cuda)
    _patch(torch.Tensor, "pin_memory", _pin_memory)
    from offload import generators, legacy_types   # they map devices with this module's functions
    _patch(torch, "Generator", generators.Generator)
    for name, legacy_type in legacy_types.TYPES.items():
        _patch(torch.cuda, name, legacy_type)
    _patch(torch.Tensor, "type", legacy_types.tensor_type(torch.Tensor.type))
    _patch(torch, "set_default_tensor_type", legacy_types.DefaultTensorType(torch.set_default_tensor_type))
    # torch.set_default_device("cuda") and `with torch.device("cuda"):` build a DeviceContext.
    context = torch.utils._device.DeviceContext
    _patch(context, "__init__", _device_context_init(context.__init__))
    _patch(torch, "get_default_device", _get_default_device(torch.get_default_device))


def uninstall():
    """Restore stock torch (tests use this to compare against it in one process)."""
    for (owner, name), original in _originals.items():
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _originals.clear()
